// Rewritten by scripts/build-release.sh for the duration of a release build; keep it one line.
let buildCommit = "unknown"
