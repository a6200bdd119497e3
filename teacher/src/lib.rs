//! The frozen teacher: an ONNX model run with ONNX Runtime.
//!
//! A teacher maps `[B, 3, S, S]` normalised images to `[B, T, D]` tokens
//! (`T = has_cls + (S/patch)^2`). What caev2 needs to know about it (name,
//! mean/std, patch size, CLS, output name, default input size) is read from
//! `caev2.*` metadata properties in the ONNX file, which the project's export
//! scripts write, and can be given or overridden on the command line.
//!
//! This crate is the one place that talks to ONNX Runtime: `target-extractor`
//! runs the teacher over every view once, the trainer runs it in the loop
//! (`train --live-teacher`) to prove the cache equivalent, and `eval` uses
//! it as the ceiling.

mod error;
mod model;

pub use error::{Result, TeacherError};
pub use model::{
    ClipModel, Teacher, TeacherDevice, TeacherSpec, deps_dir, environment, gpu_deps_dir, gpu_unavailable, models_dir, ort_library,
    ort_version, parse_triple, sha256_file,
};
