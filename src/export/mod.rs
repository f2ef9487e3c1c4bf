//! Where finished captures go. For now: files in the export directory.

pub mod files;
