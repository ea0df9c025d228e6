//! A harness's working directory: made afresh, removed on drop unless kept for a post-mortem.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A directory removed (with everything in it) on drop, unless `keep`: then its path is printed.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `path` afresh (removing whatever was there).
    pub fn create(path: PathBuf, keep: bool) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, keep })
    }

    /// `<temp dir>/<name>-<pid>`, created afresh.
    pub fn for_process(name: &str, keep: bool) -> Result<Self> {
        Self::create(std::env::temp_dir().join(format!("{name}-{}", std::process::id())), keep)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_afresh_and_removed_unless_kept() {
        let d = TempDir::for_process("testbed-tempdir", false).unwrap();
        let p = d.path().to_path_buf();
        std::fs::write(d.join("f"), b"x").unwrap();
        let again = TempDir::create(p.clone(), true).unwrap();
        assert!(!again.join("f").exists(), "made afresh");
        drop(again);
        assert!(p.is_dir(), "kept");
        drop(d);
        assert!(!p.exists(), "removed on drop");
    }
}
