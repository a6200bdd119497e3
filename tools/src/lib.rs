//! The `caev2` command line and the store tools behind it.
//!
//! `caev2 extract` drives [`target_extractor`]; `caev2 inspect` reads a
//! [`shard_store`] store: [`inspect::summary`] from the manifest, index and
//! shard reports only (fast on a large store), [`inspect::verify`] by
//! checking every checksum and that the index and shards agree.
//! [`eval`] measures encoders (k-NN, linear probe); [`export`] writes an
//! encoder in timm's format.

pub mod eval;
pub mod export;
pub mod inspect;
pub mod plot;
