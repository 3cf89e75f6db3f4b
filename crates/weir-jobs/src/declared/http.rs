//! `type = "http"`: not built yet.

use std::sync::Arc;

use weir_core::WorkerConfig;

use super::{Common, refused};
use crate::Result;
use crate::worker::ErasedWorker;

pub(super) async fn build(entry: &WorkerConfig, _common: Common) -> Result<Arc<dyn ErasedWorker>> {
    Err(refused(entry, "type = \"http\" is not built yet"))
}
