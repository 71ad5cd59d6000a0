//! Records when the agent was built: a wall clock earlier than that is certainly wrong
//! (an ECU without a battery-backed clock boots in 1970 or at its last shutdown).
//! `SOURCE_DATE_EPOCH` is honoured for reproducible builds.

fn main() {
    let now = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=REDLINE_BUILD_UNIX={now}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
}
