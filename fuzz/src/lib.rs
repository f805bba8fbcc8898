//! The sans-IO PostgreSQL code of latch, compiled on its own for fuzzing.
#[path = "../../agent/src/pg/mod.rs"]
pub mod pg;
