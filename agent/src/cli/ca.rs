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
}

pub fn main(command: CaCommand) -> ExitCode {
    match command {
        CaCommand::Export { state_dir } => {
            let dir = state_dir.unwrap_or_else(latch::ca::state_dir);
            match latch::ca::Ca::load_or_create(&dir) {
                Ok(ca) => {
                    print!("{}", ca.cert_pem());
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
