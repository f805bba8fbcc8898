//! `latch ca`: the node-local CA behind `appTls`.
use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA first if this node has none yet.
    /// Applications that verify the server (sslmode=verify-full) trust this certificate.
    Export {
        /// Where latch keeps its state; the CA lives in DIR/ca/
        /// [default: $LATCH_STATE_DIR, else /var/lib/latch]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Replace the CA with a new key and certificate (valid a year). `latch ca export` then
    /// prints the new certificate followed by the previous one, so applications can trust both
    /// while they move; agents use the new CA from their next start.
    Rotate {
        /// As for `export`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

pub fn main(command: CaCommand) -> ExitCode {
    match command {
        CaCommand::Export { state_dir } => {
            let dir = state_dir.unwrap_or_else(latch::ca::state_dir);
            match latch::ca::Ca::trust_bundle(&dir) {
                Ok(bundle) => {
                    print!("{bundle}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("latch: the node-local CA in {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
        CaCommand::Rotate { state_dir } => {
            let dir = state_dir.unwrap_or_else(latch::ca::state_dir);
            match latch::ca::Ca::rotate(&dir) {
                Ok(_) => {
                    eprintln!(
                        "latch: rotated the node-local CA in {}; agents use it from their next start",
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("latch: the node-local CA in {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
