//! caev2 stores in object storage: `s3://`, `gs://` and `az://` through the
//! Arrow project's `object_store` crate.
//!
//! - [`Publisher`] (extraction): a worker writes its shards into a local
//!   staging copy, uploads each committed shard, checks what the server
//!   stored, and only then writes the shard's report under `done/`;
//!   workers on different machines divide the shards by claims
//!   (conditional puts), which only avoid duplicated work: shards are
//!   deterministic, so correctness never rests on them.
//! - [`fetch`] (training, evaluation, inspection): a local copy of a
//!   bucket's store in a cache folder, every download checked against its
//!   shard report and fetched again when it does not match, with a size
//!   limit that never evicts a store being read.
//!
//! Credentials and endpoints come from the environment as each cloud's own
//! tools set them (`AWS_*` including `AWS_ENDPOINT_URL` for S3-compatible
//! servers, `GOOGLE_*`, `AZURE_*`); see [`Bucket::open`]. The layout in the
//! bucket is the store folder's (`shard-store/FORMAT.md`), plus `claims/`.

mod aws_profile;
mod bucket;
mod cache;
mod error;
mod publish;

pub use bucket::{Bucket, MULTIPART_THRESHOLD, PART_SIZE, Written, is_url};
pub use cache::{CacheOptions, CachedStore, Need, Pin, fetch};
pub use error::{RemoteError, Result};
pub use publish::{DEFAULT_CLAIM_TTL, Publisher, Uploaded, names, upload_store};
