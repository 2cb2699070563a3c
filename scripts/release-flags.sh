# Sourced by build-release.sh and bench.sh: the one definition of the release build the image
# ships. -Osize: the Swift code optimised for size (the binary 41.7 -> 38.9 MiB stripped, issuance
# and cached fetches no slower in the same run: docs/BENCHMARKS.md). Linker flags are in Package.swift.
release_scratch=${SDS_RELEASE_SCRATCH:-.build-release}
release_flags=(-c release --static-swift-stdlib -Xswiftc -Osize --scratch-path "$release_scratch")
# The libFuzzer build (scripts/fuzz.sh): every Swift module again with libFuzzer's coverage, in
# the release build's scratch so BoringSSL's objects are shared. It rebuilds the Swift modules the
# release build left there, so scripts/test.sh runs it after every use of the release build.
fuzz_flags=(-c release --scratch-path "${SDS_FUZZ_SCRATCH:-$release_scratch}" -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING -Xswiftc -use-ld=lld)
