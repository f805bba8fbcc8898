//! What a policy lets an application ask for in its StartupMessage — which role (`user`),
//! which database, which `options` — and the answer PostgreSQL 15 itself gives when the
//! request is refused. Pure functions; the connectors apply them before anything is resolved
//! or sent to the server.
//!
//! Answers, as PostgreSQL 15 sends them (captured from a real server, `F`/`L`/`R` fields
//! left out as everywhere in latch):
//!
//! | refused | SQLSTATE | message |
//! |---|---|---|
//! | a role the policy does not hold, a database outside the allow-list | 28000 | `no pg_hba.conf entry for host "H", user "U", database "D", no encryption` |
//! | a `-c`/`--name=value` setting the policy does not allow | 42501 | `permission denied to set parameter "N"` |
//! | another switch in `options` under a restricting policy | 42601 | `invalid command-line argument for server process: X` + hint |
use std::net::IpAddr;

use super::{ErrorFields, SqlState, startup::Startup};

/// `options` in a StartupMessage: what the policy does with it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OptionsRule {
    /// Passed to the server as sent.
    #[default]
    Pass,
    /// Any setting in it is refused.
    Refuse,
    /// Only these settings (lowercase, `-` as `_`, as PostgreSQL reads names) may be set.
    Allow(Vec<String>),
}

/// The policy's restrictions on a StartupMessage besides the role.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupRules {
    /// `None`: any database.
    pub databases: Option<Vec<String>>,
    pub options: OptionsRule,
}

/// How the server would describe the application's connection in a pg_hba answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The address the server would see the connection come from.
    pub host: IpAddr,
    /// Whether the application's connection is encrypted (TLS with latch).
    pub tls: bool,
}

/// Why a StartupMessage is refused; [`Refusal::fields`] is the server's own answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A role the policy does not hold, or a database outside its allow-list: what a server
    /// whose pg_hba.conf has no line for this user and database answers.
    #[error("no pg_hba.conf entry for host \"{host}\", user \"{user}\", database \"{database}\", {}", encryption(*.tls))]
    NoHbaEntry {
        host: IpAddr,
        user: String,
        database: String,
        tls: bool,
    },
    /// A setting in `options` the policy does not allow.
    #[error("permission denied to set parameter \"{0}\"")]
    Setting(String),
    /// `-c name` without `=value`.
    #[error("-c {0} requires a value")]
    NoValue(String),
    /// A switch latch does not read under a restricting policy.
    #[error("invalid command-line argument for server process: {0}")]
    Argument(String),
}

fn encryption(tls: bool) -> &'static str {
    if tls {
        "SSL encryption"
    } else {
        "no encryption"
    }
}

impl Refusal {
    /// The ErrorResponse fields PostgreSQL 15 sends for this refusal.
    pub fn fields(&self) -> ErrorFields {
        let code = match self {
            Refusal::NoHbaEntry { .. } => SqlState::INVALID_AUTHORIZATION,
            Refusal::Setting(_) => SqlState::INSUFFICIENT_PRIVILEGE,
            Refusal::NoValue(_) | Refusal::Argument(_) => SqlState::SYNTAX_ERROR,
        };
        let fields = ErrorFields::fatal(code, self.to_string());
        match self {
            Refusal::Argument(_) => {
                fields.with_hint("Try \"postgres --help\" for more information.")
            }
            _ => fields,
        }
    }
}

/// Checks an application's StartupMessage against the policy. `roles` are the user names the
/// policy holds credentials for; empty means one credential for every user (the default),
/// otherwise the application's `user` selects one: `Ok(Some(index into roles))`.
pub fn check(
    app: &Startup,
    roles: &[&str],
    rules: &StartupRules,
    client: Client,
) -> Result<Option<usize>, Refusal> {
    let user = app.get("user").unwrap_or_default();
    // PostgreSQL's default database is the user name.
    let database = app
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    let role = roles.iter().position(|r| *r == user);
    let database_ok = rules
        .databases
        .as_ref()
        .is_none_or(|allowed| allowed.iter().any(|d| d == database));
    if (!roles.is_empty() && role.is_none()) || !database_ok {
        return Err(Refusal::NoHbaEntry {
            host: client.host,
            user: user.to_owned(),
            database: database.to_owned(),
            tls: client.tls,
        });
    }
    if let Some(options) = app.get("options") {
        check_options(options, &rules.options)?;
    }
    check_parameters(app, &rules.options)?;
    Ok(role)
}

/// Startup parameters that are not the protocol's own (`user`, `database`, `options`,
/// `replication`, `_pq_.*`) set a setting each, as `-c name=value` in `options` does: under a
/// restricting rule they are checked the same way, except those client libraries send on their
/// own to describe the session's formatting (libpq, pgjdbc, tokio-postgres, pg8000), which the
/// application can change with SET at any time anyway.
fn check_parameters(app: &Startup, rule: &OptionsRule) -> Result<(), Refusal> {
    let allowed = match rule {
        OptionsRule::Pass => return Ok(()),
        OptionsRule::Refuse => &[][..],
        OptionsRule::Allow(names) => names.as_slice(),
    };
    for (name, _) in &app.params {
        if matches!(
            name.as_str(),
            "user" | "database" | "options" | "replication"
        ) || name.starts_with("_pq_.")
        {
            continue;
        }
        let name = setting_name(name);
        if !DRIVER_SETTINGS.contains(&name.as_str()) && !allowed.contains(&name) {
            return Err(Refusal::Setting(name));
        }
    }
    Ok(())
}

/// Settings client libraries send as startup parameters of their own accord.
const DRIVER_SETTINGS: [&str; 6] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "extra_float_digits",
    "intervalstyle",
    "timezone",
];

fn check_options(options: &str, rule: &OptionsRule) -> Result<(), Refusal> {
    let allowed = match rule {
        OptionsRule::Pass => return Ok(()),
        OptionsRule::Refuse => &[][..],
        OptionsRule::Allow(names) => names.as_slice(),
    };
    let args = split_options(options);
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let setting = if let Some(long) = arg.strip_prefix("--") {
            long.to_owned()
        } else if arg == "-c" {
            i += 1;
            match args.get(i) {
                Some(next) => next.clone(),
                None => return Err(Refusal::Argument(arg.clone())),
            }
        } else if let Some(rest) = arg.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(Refusal::Argument(arg.clone()));
        };
        let Some((name, _value)) = setting.split_once('=') else {
            return Err(Refusal::NoValue(setting));
        };
        let name = setting_name(name);
        if !allowed.contains(&name) {
            return Err(Refusal::Setting(name));
        }
        i += 1;
    }
    Ok(())
}

/// A setting's name as PostgreSQL looks it up: case-insensitive, `-` read as `_`.
pub fn setting_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// Splits `options` as PostgreSQL does (`pg_split_opts`): on whitespace, a backslash taking
/// the next character literally.
pub fn split_options(options: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return out;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace()) {
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    arg.push(escaped);
                }
            } else {
                arg.push(c);
            }
        }
        out.push(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Startup {
        Startup {
            major: 3,
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const CLIENT: Client = Client {
        host: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
        tls: false,
    };

    fn encoded(r: &Refusal) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        r.fields().encode(b'E', &mut out);
        out.to_vec()
    }

    #[test]
    fn with_one_credential_any_user_is_served() {
        let s = startup(&[("user", "whoever"), ("database", "app")]);
        assert_eq!(check(&s, &[], &StartupRules::default(), CLIENT), Ok(None));
    }

    #[test]
    fn the_user_the_application_asks_for_selects_the_role() {
        let roles = ["migrator", "reader"];
        let rules = StartupRules::default();
        let s = startup(&[("user", "reader"), ("database", "app")]);
        assert_eq!(check(&s, &roles, &rules, CLIENT), Ok(Some(1)));
        let s = startup(&[("user", "migrator")]);
        assert_eq!(check(&s, &roles, &rules, CLIENT), Ok(Some(0)));
    }

    #[test]
    fn a_role_the_policy_does_not_hold_gets_postgresqls_no_hba_entry_bytes() {
        let s = startup(&[("user", "admin"), ("database", "postgres")]);
        let err = check(&s, &["reader"], &StartupRules::default(), CLIENT).unwrap_err();
        // PostgreSQL 15's ErrorResponse for a user pg_hba.conf has no line for, as captured,
        // without the F, L and R fields.
        let want = b"E\x00\x00\x00\x77SFATAL\x00VFATAL\x00C28000\x00Mno pg_hba.conf entry for \
host \"127.0.0.1\", user \"admin\", database \"postgres\", no encryption\x00\x00";
        assert_eq!(encoded(&err), want.to_vec());
        // User names are case-sensitive, as PostgreSQL's are once sent.
        let s = startup(&[("user", "Reader")]);
        assert!(check(&s, &["reader"], &StartupRules::default(), CLIENT).is_err());
    }

    #[test]
    fn a_database_outside_the_allow_list_is_refused_like_a_pg_hba_line_would() {
        let rules = StartupRules {
            databases: Some(vec!["app".into()]),
            options: OptionsRule::Pass,
        };
        let ok = startup(&[("user", "u"), ("database", "app")]);
        assert_eq!(check(&ok, &[], &rules, CLIENT), Ok(None));
        // No database: the server's default is the user name.
        let default = startup(&[("user", "u")]);
        let tls = Client {
            tls: true,
            ..CLIENT
        };
        assert_eq!(
            check(&default, &[], &rules, tls).unwrap_err().to_string(),
            "no pg_hba.conf entry for host \"127.0.0.1\", user \"u\", database \"u\", SSL encryption"
        );
        let other = startup(&[("user", "u"), ("database", "postgres")]);
        assert_eq!(
            check(&other, &[], &rules, CLIENT)
                .unwrap_err()
                .fields()
                .code,
            "28000"
        );
    }

    #[test]
    fn options_pass_by_default_and_refuse_answers_as_for_a_forbidden_setting() {
        let s = startup(&[
            ("user", "u"),
            ("options", "-c session_replication_role=replica"),
        ]);
        assert_eq!(check(&s, &[], &StartupRules::default(), CLIENT), Ok(None));
        let refuse = StartupRules {
            databases: None,
            options: OptionsRule::Refuse,
        };
        let err = check(&s, &[], &refuse, CLIENT).unwrap_err();
        let f = err.fields();
        assert_eq!(
            (f.code.as_str(), f.message.as_str()),
            (
                "42501",
                "permission denied to set parameter \"session_replication_role\""
            )
        );
        // An empty options string sets nothing.
        let empty = startup(&[("user", "u"), ("options", "  ")]);
        assert_eq!(check(&empty, &[], &refuse, CLIENT), Ok(None));
    }

    #[test]
    fn an_allow_list_admits_only_its_settings_in_every_spelling() {
        let rules = StartupRules {
            databases: None,
            options: OptionsRule::Allow(vec!["statement_timeout".into(), "search_path".into()]),
        };
        let ok = startup(&[(
            "options",
            "-c statement_timeout=5s -cSearch_Path=a,b --statement-timeout=1 -c search_path=x\\ y",
        )]);
        assert_eq!(check(&ok, &[], &rules, CLIENT), Ok(None));
        for (options, want) in [
            (
                "-c statement_timeout=1 -c role=admin",
                Refusal::Setting("role".into()),
            ),
            ("--work-mem=1GB", Refusal::Setting("work_mem".into())),
            ("-c search_path", Refusal::NoValue("search_path".into())),
            ("-S 1024", Refusal::Argument("-S".into())),
            ("-c", Refusal::Argument("-c".into())),
        ] {
            let s = startup(&[("user", "u"), ("options", options)]);
            assert_eq!(check(&s, &[], &rules, CLIENT), Err(want), "{options}");
        }
        let hint = Refusal::Argument("-x".into()).fields();
        assert_eq!(hint.code, "42601");
        assert_eq!(
            hint.hint.as_deref(),
            Some("Try \"postgres --help\" for more information.")
        );
    }

    #[test]
    fn startup_parameters_are_settings_too_under_a_restricting_rule() {
        let client = Client {
            host: "127.0.0.1".parse().unwrap(),
            tls: false,
        };
        let app = startup(&[
            ("user", "app"),
            ("database", "orders"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("application_name", "worker"),
            ("extra_float_digits", "3"),
            ("_pq_.something", "x"),
        ]);
        // What drivers send passes under every rule.
        for options in [
            OptionsRule::Pass,
            OptionsRule::Refuse,
            OptionsRule::Allow(vec!["statement_timeout".into()]),
        ] {
            let rules = StartupRules {
                databases: None,
                options,
            };
            assert_eq!(check(&app, &[], &rules, client), Ok(None));
        }
        // A setting sent as its own parameter is checked as `-c` would be.
        let sneaky = startup(&[("user", "app"), ("Statement_Timeout", "0")]);
        let refuse = StartupRules {
            databases: None,
            options: OptionsRule::Refuse,
        };
        assert_eq!(
            check(&sneaky, &[], &refuse, client),
            Err(Refusal::Setting("statement_timeout".into()))
        );
        let allow = StartupRules {
            databases: None,
            options: OptionsRule::Allow(vec!["statement_timeout".into()]),
        };
        assert_eq!(check(&sneaky, &[], &allow, client), Ok(None));
        let pass = StartupRules::default();
        assert_eq!(check(&sneaky, &[], &pass, client), Ok(None));
    }

    #[test]
    fn options_split_on_whitespace_with_backslash_escapes_as_postgresql_does() {
        assert_eq!(
            split_options(" -c a=b\\ c\t--x=\\\\y "),
            vec!["-c", "a=b c", "--x=\\y"]
        );
    }
}
