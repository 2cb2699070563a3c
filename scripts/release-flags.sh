# Sourced by build-release.sh and bench.sh: the one definition of the release build the image
# ships. -Osize: the Swift code optimised for size (the binary 41.7 -> 38.9 MiB stripped, issuance
# and cached fetches no slower in the same run: docs/BENCHMARKS.md). Linker flags are in Package.swift.
release_scratch=${SDS_RELEASE_SCRATCH:-.build-release}
release_flags=(-c release --static-swift-stdlib -Xswiftc -Osize --scratch-path "$release_scratch")
