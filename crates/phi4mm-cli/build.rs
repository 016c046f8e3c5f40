// Records the git commit for `phi4mm bench` reports, with "-dirty" when tracked files differ
// from it (a binary built before its changes were committed).
fn main() {
    let git = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty());
    println!("cargo:rustc-env=PHI4MM_GIT_COMMIT={commit}{}", if dirty { "-dirty" } else { "" });
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/logs/HEAD");
    println!("cargo:rerun-if-changed=../../.git/index");
    // Source edits change the dirty flag.
    println!("cargo:rerun-if-changed=../phi4mm/src");
    println!("cargo:rerun-if-changed=src");
}
