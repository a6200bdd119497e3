//! Listing an image folder: ImageNet layout (`root/<class>/<image>`) or a
//! flat folder of unlabelled images.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ExtractError, Result};

/// File extensions taken as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpeg", "jpg", "png", "bmp", "gif", "webp", "tif", "tiff"];

/// One image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Path relative to the root, `/`-separated.
    pub rel: String,
    /// Class index, for files inside a class folder.
    pub label: Option<i32>,
    /// Why the file cannot be read, found while listing (a dangling link, a
    /// name that is not UTF-8): extract skips it into the shard report like
    /// an undecodable file. `rel` then holds a lossy rendering of the name.
    pub problem: Option<String>,
}

/// The images of a folder, sorted by relative path; the image id is the
/// position in this list.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folder.
    pub root: PathBuf,
    /// The files.
    pub files: Vec<ImageFile>,
    /// Class folder names, sorted; label `i` is `classes[i]`.
    pub classes: Vec<String>,
}

impl Dataset {
    /// List `root`. Files directly in `root` are unlabelled; files under
    /// `root/<class>/` (at any depth) get the class's index. Hidden files and
    /// folders are ignored, symbolic links are followed.
    ///
    /// # Errors
    /// IO errors naming the folder, or a folder with no images.
    pub fn scan(root: &Path) -> Result<Self> {
        let meta = std::fs::metadata(root).map_err(|e| ExtractError::io(root, "read dataset folder", e))?;
        if !meta.is_dir() {
            return Err(ExtractError::Dataset { root: root.to_owned(), what: "not a folder".into() });
        }
        let mut rels = Vec::new();
        walk(root, "", None, &mut rels)?;
        rels.sort();
        let mut classes: Vec<String> = rels.iter().filter_map(|(r, _)| r.split_once('/').map(|(c, _)| c.to_owned())).collect();
        classes.dedup();
        let files = rels
            .into_iter()
            .map(|(rel, problem)| {
                let label = rel.split_once('/').and_then(|(c, _)| classes.binary_search_by(|x| x.as_str().cmp(c)).ok()).map(|i| i as i32);
                ImageFile { rel, label, problem }
            })
            .collect::<Vec<_>>();
        if files.is_empty() {
            return Err(ExtractError::Dataset {
                root: root.to_owned(),
                what: format!("holds no images (looked for {} files, in class sub-folders or directly)", IMAGE_EXTENSIONS.join("/")),
            });
        }
        Ok(Self { root: root.to_owned(), files, classes })
    }

    /// SHA-256 of the relative paths, each followed by `\n`, hex.
    pub fn file_list_sha256(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.rel.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Absolute path of an image.
    pub fn path_of(&self, id: usize) -> PathBuf {
        self.root.join(&self.files[id].rel)
    }
}

fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// Collect `(relative path, problem)` of the images under `dir`. Entries that
/// cannot be read are kept with their problem when their name says image
/// (a dangling link, a name that is not UTF-8, or anything inside a folder
/// whose name is not), so that ids stay stable and the report names them.
fn walk(dir: &Path, prefix: &str, inherited: Option<&str>, out: &mut Vec<(String, Option<String>)>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| ExtractError::io(dir, "list folder", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ExtractError::io(dir, "list folder", e))?;
        let os_name = entry.file_name();
        let (name, bad_name) = match os_name.to_str() {
            Some(n) => (n.to_owned(), None),
            None => (os_name.to_string_lossy().into_owned(), Some("its name is not UTF-8 (store paths are UTF-8); rename it")),
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let problem = inherited.or(bad_name);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                let why = bad_name.map(|_| "a folder on its path has a name that is not UTF-8; rename it");
                walk(&path, &rel, inherited.or(why), out)?;
            }
            Ok(_) if is_image_name(&name) => out.push((rel, problem.map(str::to_owned))),
            Ok(_) => {}
            Err(e) if is_image_name(&name) => {
                let why = if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                    format!("dangling symbolic link ({e})")
                } else {
                    format!("cannot read it: {e}")
                };
                out.push((rel, Some(problem.map_or(why, str::to_owned))));
            }
            Err(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_layout_and_flat_files() {
        let d = tempfile::tempdir().expect("tmp");
        for p in ["n02/b.JPEG", "n01/a.jpeg", "n01/z.png", "loose.jpg", "n01/notes.txt", ".hidden/x.jpg"] {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, b"x").expect("write");
        }
        let ds = Dataset::scan(d.path()).expect("scan");
        let rels: Vec<_> = ds.files.iter().map(|f| (f.rel.as_str(), f.label)).collect();
        assert_eq!(rels, vec![("loose.jpg", None), ("n01/a.jpeg", Some(0)), ("n01/z.png", Some(0)), ("n02/b.JPEG", Some(1))]);
        assert_eq!(ds.classes, vec!["n01", "n02"]);
        assert_eq!(ds.file_list_sha256().len(), 64);
    }

    #[test]
    fn dangling_links_and_non_utf8_names_are_listed_with_their_problem() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("n01")).expect("mkdir");
        std::fs::write(d.path().join("n01/a.jpg"), b"x").expect("write");
        std::os::unix::fs::symlink(d.path().join("gone.jpg"), d.path().join("n01/b.jpg")).expect("link");
        std::os::unix::fs::symlink(d.path().join("gone"), d.path().join("n01/notes")).expect("link");
        let bad = std::ffi::OsStr::from_bytes(b"c\xff.jpg");
        std::fs::write(d.path().join("n01").join(bad), b"x").expect("write");
        let ds = Dataset::scan(d.path()).expect("scan");
        let got: Vec<_> = ds.files.iter().map(|f| (f.rel.as_str(), f.problem.is_some())).collect();
        assert_eq!(got, vec![("n01/a.jpg", false), ("n01/b.jpg", true), ("n01/c\u{fffd}.jpg", true)]);
        assert!(ds.files[1].problem.as_deref().is_some_and(|p| p.contains("dangling")), "{:?}", ds.files[1]);
        assert!(ds.files[2].problem.as_deref().is_some_and(|p| p.contains("UTF-8")), "{:?}", ds.files[2]);
    }

    #[test]
    fn empty_folder_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(Dataset::scan(d.path()).expect_err("empty").to_string().contains("holds no images"));
    }
}
