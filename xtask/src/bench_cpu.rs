//! What the CPUs did over a bench run: the proxy's user and system time, and the whole
//! machine's busy time. From them a case says what its speed target leaves the proxy. At the
//! target's rate everything that runs must fit in the machine's CPUs, so a proxy can reach it
//! only if it uses at most `CPUs × 1 s / rate − what the rest of the machine used per
//! operation` (the rest: client, server and anything else, measured in the same run). It is a
//! bound, not a forecast: meeting it does not make the target reachable, missing it shows
//! that the target is out of reach on this machine unless the work per operation changes.
use anyhow::{Context, Result};

/// Clock ticks of one process (its threads, user and system) and of the whole machine (busy:
/// everything but idle and I/O wait).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ticks {
    pub user: u64,
    pub system: u64,
    pub machine_busy: u64,
}

/// A process's (if any) and the machine's ticks at one moment, to measure a run from.
pub struct Mark {
    pid: Option<u32>,
    at: Ticks,
}

impl Mark {
    /// The ticks of process `pid` and of the machine.
    pub fn take(pid: u32) -> Result<Mark> {
        Ok(Mark {
            pid: Some(pid),
            at: now(Some(pid))?,
        })
    }

    /// The machine's ticks alone (a run without a proxy).
    pub fn machine() -> Result<Mark> {
        Ok(Mark {
            pid: None,
            at: now(None)?,
        })
    }

    /// The ticks since the mark was taken.
    pub fn since(&self) -> Result<Ticks> {
        let now = now(self.pid)?;
        Ok(Ticks {
            user: now.user.saturating_sub(self.at.user),
            system: now.system.saturating_sub(self.at.system),
            machine_busy: now.machine_busy.saturating_sub(self.at.machine_busy),
        })
    }
}

/// CPU time per operation, in µs: the proxy's in user space and in the kernel, and the rest
/// of the machine's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerOp {
    pub user: f64,
    pub system: f64,
    pub rest: f64,
}

impl PerOp {
    /// The proxy's CPU time per operation.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }
}

impl Ticks {
    /// The whole machine's busy time per operation over `ops` operations, in µs.
    pub fn machine_per_op(&self, ops: f64) -> Option<f64> {
        (ops > 0.0).then(|| ticks_us(self.machine_busy) / ops)
    }

    /// These ticks spread over `ops` operations (`None` for none).
    pub fn per_op(&self, ops: f64) -> Option<PerOp> {
        if ops <= 0.0 {
            return None;
        }
        let proxy = self.user + self.system;
        Some(PerOp {
            user: ticks_us(self.user) / ops,
            system: ticks_us(self.system) / ops,
            rest: ticks_us(self.machine_busy.saturating_sub(proxy)) / ops,
        })
    }
}

/// Each field's median over `runs`.
pub fn median(runs: &[PerOp]) -> Option<PerOp> {
    let of = |f: fn(&PerOp) -> f64| crate::bench::median(&runs.iter().map(f).collect::<Vec<_>>());
    Some(PerOp {
        user: of(|p| p.user)?,
        system: of(|p| p.system)?,
        rest: of(|p| p.rest)?,
    })
}

/// The most CPU (µs) per operation a proxy may use for `rate` operations a second on `cpus`
/// CPUs when the rest of the machine uses `rest` µs per operation.
pub fn budget(cpus: usize, rate: f64, rest: f64) -> f64 {
    cpus as f64 * 1e6 / rate - rest
}

/// One line: what the goal (`goal`, `rate` operations a second) leaves the proxy `name`, against
/// what it used; `direct`: the machine's CPU per operation without a proxy, when measured.
pub fn verdict(
    name: &str,
    goal: &str,
    rate: f64,
    unit: &str,
    got: &PerOp,
    direct: Option<f64>,
) -> String {
    let cpus = cpus();
    let have = budget(cpus, rate, 0.0);
    let left = budget(cpus, rate, got.rest);
    let fits = conclusion(left, got);
    let direct = direct.map_or(String::new(), |d| {
        format!(" (direct, the machine used {d:.0})")
    });
    format!(
        "{name}: {goal} is {rate:.0}/s, {have:.0} µs of CPU per {unit} on {cpus} CPUs{direct}; \
         with {name} in the path the rest of the machine used {rest:.0}, leaving {left:.0}; \
         {name} used {total:.0} ({system:.0} in the kernel): {fits}",
        rest = got.rest,
        total = got.total(),
        system = got.system,
    )
}

/// How what the proxy used compares with the `left` µs per operation.
fn conclusion(left: f64, got: &PerOp) -> &'static str {
    if left <= 0.0 {
        "the rest alone is more than the CPUs have"
    } else if got.system > left {
        "its time in the kernel alone is more than is left"
    } else if got.total() > left {
        "more than is left"
    } else {
        "within what is left"
    }
}

/// The machine's online CPUs (the `cpuN` lines of /proc/stat, which its busy time sums).
pub fn cpus() -> usize {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_machine(&s))
        .map_or(1, |(_, n)| n.max(1))
}

fn now(pid: Option<u32>) -> Result<Ticks> {
    let (user, system) = match pid {
        Some(pid) => {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat"))?;
            parse_process(&stat).with_context(|| format!("no CPU times in /proc/{pid}/stat"))?
        }
        None => (0, 0),
    };
    let machine = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let (machine_busy, _) = parse_machine(&machine).context("no cpu line in /proc/stat")?;
    Ok(Ticks {
        user,
        system,
        machine_busy,
    })
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name before
/// them may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_process(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The busy ticks of all CPUs (user, nice, system, irq, softirq, steal: guest time is
/// already in user) from /proc/stat's `cpu` line, and how many `cpuN` lines there are.
fn parse_machine(stat: &str) -> Option<(u64, usize)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((busy, cpus))
}

/// Clock ticks as µs.
pub fn ticks_us(ticks: u64) -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    ticks as f64 * 1e6 / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_processs_user_and_system_time() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 31 17 0 0 20 0 3 0";
        assert_eq!(parse_process(stat), Some((31, 17)));
        assert_eq!(parse_process("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_the_machines_busy_time_and_cpus() {
        let stat = "cpu  100 5 40 900 30 2 3 1 0 0\n\
                    cpu0 50 2 20 450 15 1 2 0 0 0\n\
                    cpu1 50 3 20 450 15 1 1 1 0 0\n\
                    intr 12345\nctxt 99\n";
        // user + nice + system + irq + softirq + steal; idle and iowait are not busy
        assert_eq!(parse_machine(stat), Some((151, 2)));
        assert_eq!(parse_machine("intr 1\n"), None);
    }

    #[test]
    fn the_rest_of_the_machine_is_what_the_proxy_did_not_use() {
        let hz = ticks_us(1);
        let t = Ticks {
            user: 2,
            system: 6,
            machine_busy: 20,
        };
        let p = t.per_op(4.0).unwrap();
        assert_eq!(p.user, 2.0 * hz / 4.0);
        assert_eq!(p.system, 6.0 * hz / 4.0);
        assert_eq!(p.rest, 12.0 * hz / 4.0);
        assert_eq!(t.machine_per_op(4.0), Some(20.0 * hz / 4.0));
        assert_eq!(t.per_op(0.0), None);
    }

    #[test]
    fn the_budget_is_what_the_cpus_have_left_at_the_goals_rate() {
        // 2 CPUs, 13 248 connections/s: 151 µs each, of which the rest used 99.
        let left = budget(2, 13_248.0, 99.0);
        assert!((left - 51.97).abs() < 0.01, "{left}");
        // a goal the machine cannot run even without a proxy leaves less than nothing
        assert!(budget(2, 40_000.0, 60.0) < 0.0);
    }

    #[test]
    fn the_conclusion_names_what_does_not_fit() {
        let used = PerOp {
            user: 10.0,
            system: 40.0,
            rest: 0.0,
        };
        assert_eq!(
            conclusion(-1.0, &used),
            "the rest alone is more than the CPUs have"
        );
        assert_eq!(
            conclusion(30.0, &used),
            "its time in the kernel alone is more than is left"
        );
        assert_eq!(conclusion(45.0, &used), "more than is left");
        assert_eq!(conclusion(50.0, &used), "within what is left");
    }

    #[test]
    fn medians_are_taken_field_by_field() {
        let p = |user, system, rest| PerOp { user, system, rest };
        let m = median(&[p(1.0, 9.0, 5.0), p(3.0, 7.0, 4.0), p(2.0, 8.0, 6.0)]).unwrap();
        assert_eq!(m, p(2.0, 8.0, 5.0));
        assert_eq!(median(&[]), None);
    }
}
