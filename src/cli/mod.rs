//! The command line: the clap tree (also the source of the man pages) and the commands that
//! only the command line runs.

pub mod overlay;
