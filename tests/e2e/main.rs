//! End-to-end tests: a real server on 127.0.0.1:0, the Rust client, and answers compared with an
//! independent reader (the parquet crate on the files, or DataFusion on its own).

mod anndata;
mod common;
mod errors;
mod flight;
mod flight_sql;
mod fuzz;
mod operations;
mod plans;
mod pushdown;
mod security;
mod selections;
