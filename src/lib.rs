//! stemforge: builds hardened, stemcell-style OS images and proves them.
//!
//! The pipeline reads like the list of its phases:
//! `plan → bootstrap → stages → disk → formats → verify`.
//! Each phase lives in its own module; [`pipeline`] strings them together.

pub mod assets;
pub mod benchmarks;
pub mod bootstrap;
pub mod boshagent;
pub mod cache;
pub mod cachectl;
pub mod chroot;
pub mod cli;
pub mod config;
pub mod disk;
pub mod exec;
pub mod ext4;
pub mod formats;
pub mod fsutil;
pub mod interrupt;
pub mod layers;
pub mod matrix;
pub mod osimage;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod reproducible;
pub mod reuse;
pub mod roles;
pub mod scan;
pub mod stage;
pub mod treearchive;
pub mod verify;

/// The version of this stemforge build, recorded in images and reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
