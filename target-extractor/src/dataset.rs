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
            return Err(ExtractError::Dataset(format!("{} is not a folder", root.display())));
        }
        let mut rels = Vec::new();
        walk(root, "", &mut rels)?;
        rels.sort();
        let mut classes: Vec<String> = rels.iter().filter_map(|r| r.split_once('/').map(|(c, _)| c.to_owned())).collect();
        classes.dedup();
        let files = rels
            .into_iter()
            .map(|rel| {
                let label = rel.split_once('/').and_then(|(c, _)| classes.binary_search_by(|x| x.as_str().cmp(c)).ok()).map(|i| i as i32);
                ImageFile { rel, label }
            })
            .collect::<Vec<_>>();
        if files.is_empty() {
            return Err(ExtractError::Dataset(format!(
                "{} holds no images (looked for {} files, in class sub-folders or directly)",
                root.display(),
                IMAGE_EXTENSIONS.join("/")
            )));
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

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| ExtractError::io(dir, "list folder", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ExtractError::io(dir, "list folder", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(ExtractError::Dataset(format!("{}: file name is not UTF-8: {:?}", dir.display(), entry.file_name())));
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| ExtractError::io(&path, "stat", e))?;
        let rel = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") };
        if meta.is_dir() {
            walk(&path, &rel, out)?;
        } else if let Some((_, ext)) = name.rsplit_once('.')
            && IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
        {
            out.push(rel);
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
    fn empty_folder_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(Dataset::scan(d.path()).expect_err("empty").to_string().contains("holds no images"));
    }
}
