//! The check kinds: the scanner's vocabulary. Each kind says how it
//! evaluates offline (the files of a root tree) and live (the running
//! system), and always returns the evidence that decided.

pub mod accounts;
pub mod audit;
pub mod file;
pub mod fswalk;
pub mod kmod;
pub mod kv;
pub mod mount;
pub mod package;
pub mod service;
pub mod sshd;
pub mod sysctl;
