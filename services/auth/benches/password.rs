//! What one login costs in argon2id at the default parameters, and how the
//! bounded hashing pool behaves under a burst.
//!
//! `cargo bench -p flashmesh-auth --bench password`

use criterion::{Criterion, criterion_group, criterion_main};
use flashmesh_auth::{config::PasswordCost, password::PasswordHasher};

fn password_hashing(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let hasher = PasswordHasher::new(PasswordCost::default()).expect("default cost is valid");
    let hash = runtime
        .block_on(hasher.hash("correct horse battery"))
        .expect("hash");

    let mut group = c.benchmark_group("argon2id default cost");
    group.sample_size(30);
    group.bench_function("verify one password", |b| {
        b.to_async(&runtime)
            .iter(|| hasher.verify("correct horse battery", Some(&hash)));
    });
    group.bench_function("verify 16 concurrent passwords", |b| {
        b.to_async(&runtime).iter(|| {
            futures::future::join_all(
                (0..16).map(|_| hasher.verify("correct horse battery", Some(&hash))),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, password_hashing);
criterion_main!(benches);
