# Sourced by build-release.sh, bench.sh, fuzz.sh and test.sh: the one definition of the release
# build the image ships. -Osize: the Swift code optimised for size (the binary 41.7 -> 38.9 MiB
# stripped, issuance and cached fetches no slower in the same run: docs/BENCHMARKS.md). The Swift
# runtime is linked statically into sds-agent alone, by its linker flags in Package.swift, so the
# Swift suites, the benchmark and the image share one compile of every module.
release_scratch=${SDS_RELEASE_SCRATCH:-.build-release}
release_flags=(-c release -Xswiftc -Osize --scratch-path "$release_scratch")
# The libFuzzer build (scripts/fuzz.sh): the same flags with SDS_FUZZ=1 in the environment, which
# Package.swift reads to add libFuzzer's coverage to this package's modules only. In the same
# scratch, every dependency is shared with the release build; only our modules are recompiled
# (and again by the next release build), so scripts/test.sh runs it after every use of the
# release build.
fuzz_flags=(-c release -Xswiftc -Osize --scratch-path "${SDS_FUZZ_SCRATCH:-$release_scratch}")
