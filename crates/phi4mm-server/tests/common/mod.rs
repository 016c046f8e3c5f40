//! What the server tests share: the fixtures, the tiny engine, a scheduler without caches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)] // test code

use std::path::PathBuf;
use std::sync::Arc;

use phi4mm::{DType, Engine, LoadOptions, SchedulerOptions};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny checkpoint in f32.
pub fn engine() -> Arc<Engine> {
    let opts = LoadOptions { dtype: DType::F32, ..Default::default() };
    Arc::new(Engine::load(&fixtures().join("tiny"), opts).expect("the tiny checkpoint loads"))
}

/// Up to `max_batch` sequences and `max_queue` waiting, no caches (as `Engine::generate`).
pub fn sched(max_batch: usize, max_queue: usize) -> SchedulerOptions {
    SchedulerOptions { max_batch, max_queue, kv_budget: 1 << 20, ..SchedulerOptions::single() }
}
