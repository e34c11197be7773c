//! Files in the agent's state folder: private (mode 0600) and written atomically, so a crash
//! leaves either the old contents or the new, never a torn file, and no other user can read
//! them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Writes `bytes` to `path` with mode 0600: to a temporary file beside it, synced, then
/// renamed over `path`, and the folder synced so the rename survives a power cut.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // `mode` applies only to a new file: a stale temporary keeps its own otherwise.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// Puts `fresh` (a complete folder written beside `dest`) in place of the folder `dest`:
/// the old folder moves to `<dest>.old` and is removed once `fresh` is in, so a reader finds
/// the old folder or the new one, never half of one.
pub fn replace_dir(fresh: &Path, dest: &Path) -> anyhow::Result<()> {
    let old = dest.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
    }
    std::fs::rename(fresh, dest).with_context(|| format!("writing {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_replaced_whole_and_unreadable_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        // A stale, world-readable temporary from a crash does not leak its mode.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, b"stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"first").unwrap();
        write_private(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_folder_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (dest, fresh) = (dir.path().join("personal"), dir.path().join("personal.new"));
        for (i, contents) in ["first", "second"].into_iter().enumerate() {
            std::fs::create_dir(&fresh).unwrap();
            std::fs::write(fresh.join(format!("file{i}")), contents).unwrap();
            replace_dir(&fresh, &dest).unwrap();
        }
        let names: Vec<_> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file1"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
