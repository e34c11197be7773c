//! The agent's state folder: [`StateDir`] names every file and folder in it. The folder is
//! private (mode 0700, whatever the umask), every file in it 0600 and every folder 0700
//! ([`restrict`]), and the writes here are atomic, so a crash leaves either the old contents
//! or the new, never a torn file, and no other user can read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The agent's state folder (`device.state_dir`, `local serve --state-dir`): the one place
/// that knows what lives in it. Everything derived from the user's text is listed in
/// [`StateDir::derived_from_text`], which `forget` erases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The folder at `root` (nothing is created until [`StateDir::create`]).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// Creates the folder if it is missing, mode 0700; an existing one is made 0700 too (a
    /// folder an older version or a loose umask left readable).
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let what = || format!("creating {}", self.root.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(what)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .with_context(what)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The encrypted interaction store.
    pub fn store(&self) -> PathBuf {
        self.root.join("interactions.sqlite")
    }

    /// The store's key (mode 0600). It holds no text: the empty store stays under it after
    /// `forget`.
    pub fn store_key(&self) -> PathBuf {
        self.root.join("store.key")
    }

    /// The user's consent to federated participation.
    pub fn consent(&self) -> PathBuf {
        self.root.join("consent.json")
    }

    /// The personal adapter (PEFT layout) that `Generate` uses.
    pub fn personal(&self) -> PathBuf {
        self.root.join("personal")
    }

    /// What the last finished adaptation covered, inside an adapter folder.
    pub fn adapted_state_in(adapter_dir: &Path) -> PathBuf {
        adapter_dir.join("state.json")
    }

    /// Where a finished adaptation writes the new adapter before swapping it in.
    pub fn personal_fresh(&self) -> PathBuf {
        self.root.join("personal.new")
    }

    /// The checkpoint of an adaptation cut by its time budget (an adapter trained on the
    /// text).
    pub fn adaptation_progress(&self) -> PathBuf {
        self.root.join("personal.progress")
    }

    /// Everything in the folder derived from the user's text besides the store: the
    /// personal adapter, its fresh copy, the previous one mid-swap ([`replace_dir`]'s
    /// `<dest>.old`) and the checkpoint of a cut adaptation.
    pub fn derived_from_text(&self) -> [PathBuf; 4] {
        let personal = self.personal();
        [
            aside(&personal),
            personal,
            self.personal_fresh(),
            self.adaptation_progress(),
        ]
    }

    /// The federation's latest global adapter (PEFT layout), written by `run` at each
    /// download: where the personal adapter starts when there is none yet. Not derived from
    /// this user's text alone (it is the aggregator's release).
    pub fn global(&self) -> PathBuf {
        self.root.join("global")
    }

    /// Where a downloaded global adapter is written before it replaces [`StateDir::global`].
    pub fn global_fresh(&self) -> PathBuf {
        self.root.join("global.new")
    }

    /// The device's Ed25519 key (mode 0600).
    pub fn device_key(&self) -> PathBuf {
        self.root.join("device.key")
    }

    /// The device id and the last round reported.
    pub fn agent_state(&self) -> PathBuf {
        self.root.join("agent.json")
    }

    /// What leaving the federation erases: the device's key and its enrolment.
    pub fn federation_credentials(&self) -> [PathBuf; 2] {
        [self.device_key(), self.agent_state()]
    }

    /// The local API's socket, unless given elsewhere.
    pub fn socket(&self) -> PathBuf {
        self.root.join("local.sock")
    }
}

/// Where [`replace_dir`] keeps the previous folder while the new one moves in.
fn aside(dest: &Path) -> PathBuf {
    dest.with_extension("old")
}

/// Makes `path` private, whatever the umask it was written under: a file 0600, a folder
/// 0700 with everything in it likewise. Symbolic links are left alone (never followed).
pub fn restrict(path: &Path) -> anyhow::Result<()> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return Ok(());
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?
        {
            restrict(&entry?.path())?;
        }
    }
    Ok(())
}

/// Removes a file or folder; returns whether there was one.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("erasing {}", path.display())),
    }
}

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
    let old = aside(dest);
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
    fn the_state_folder_and_what_is_written_in_it_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A new folder, and parents made for it.
        let fresh = StateDir::new(dir.path().join("a/state"));
        fresh.create().unwrap();
        assert_eq!(mode(fresh.root()), 0o700);
        // An existing folder left world-readable.
        let old = StateDir::new(dir.path().join("old"));
        std::fs::create_dir(old.root()).unwrap();
        std::fs::set_permissions(old.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
        old.create().unwrap();
        assert_eq!(mode(old.root()), 0o700);
        // An adapter folder written as the model crate writes it (the process's umask).
        let personal = old.personal();
        std::fs::create_dir_all(personal.join("inner")).unwrap();
        for (p, m) in [(&personal, 0o755), (&personal.join("inner"), 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let file = personal.join("inner/adapter_model.safetensors");
        std::fs::write(&file, b"weights").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", personal.join("link")).unwrap();
        restrict(&personal).unwrap();
        assert_eq!(mode(&personal), 0o700);
        assert_eq!(mode(&personal.join("inner")), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_ne!(
            mode(Path::new("/etc/hostname")),
            0o600,
            "links are not followed"
        );
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

    #[test]
    fn everything_derived_from_text_is_inside_the_folder_and_apart_from_what_stays() {
        let dir = StateDir::new("/state");
        let derived = dir.derived_from_text();
        let stays = [dir.store(), dir.store_key(), dir.consent(), dir.global()];
        for p in &derived {
            assert_eq!(p.parent(), Some(dir.root()), "{}", p.display());
            assert!(!stays.contains(p), "{}", p.display());
        }
        // The folder `replace_dir` swaps the personal adapter through is among them.
        assert!(derived.contains(&aside(&dir.personal())));
        let mut names: Vec<_> = derived.iter().collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), derived.len());
    }

    #[test]
    fn remove_takes_files_and_folders_and_reports_absence() {
        let dir = tempfile::tempdir().unwrap();
        let (file, folder) = (dir.path().join("f"), dir.path().join("d"));
        std::fs::write(&file, b"x").unwrap();
        std::fs::create_dir_all(folder.join("inner")).unwrap();
        assert!(remove(&file).unwrap());
        assert!(remove(&folder).unwrap());
        assert!(!remove(&folder).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
