//! A harness's working directory: a fresh directory made by `tempfile` (a random suffix, so a
//! run never finds a previous run's files), removed on drop unless kept for a post-mortem.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A directory removed (with everything in it) on drop, unless `keep`: then its path is printed.
#[derive(Debug)]
pub struct TempDir {
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

impl TempDir {
    /// A fresh directory beside `path`, named after it: `path-XXXXXX`.
    pub fn create(path: PathBuf, keep: bool) -> Result<Self> {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().with_context(|| format!("no directory name in {}", path.display()))?;
        let mut prefix = name.to_os_string();
        prefix.push("-");
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(parent)
            .with_context(|| format!("create {}-*", path.display()))?;
        Ok(Self { dir: Some(dir), keep })
    }

    /// `<temp dir>/<name>-<pid>-XXXXXX`.
    pub fn for_process(name: &str, keep: bool) -> Result<Self> {
        Self::create(std::env::temp_dir().join(format!("{name}-{}", std::process::id())), keep)
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("a directory until dropped").path()
    }

    /// `path/name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && self.keep
        {
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_and_removed_unless_kept() {
        let d = TempDir::for_process("testbed-tempdir", false).unwrap();
        let p = d.path().to_path_buf();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("testbed-tempdir-{}-", std::process::id())), "{name}");
        std::fs::write(d.join("f"), b"x").unwrap();
        // The same name again is another, empty directory.
        let base = std::env::temp_dir().join(format!("testbed-tempdir-{}", std::process::id()));
        let again = TempDir::create(base, true).unwrap();
        assert_ne!(again.path(), p);
        assert!(!again.join("f").exists(), "made afresh");
        let kept = again.path().to_path_buf();
        drop(again);
        assert!(kept.is_dir(), "kept");
        std::fs::remove_dir_all(&kept).unwrap();
        drop(d);
        assert!(!p.exists(), "removed on drop");
    }
}
