# Task runner shortcuts; each recipe is a `cargo xtask` task, which works without `just`.

default: test

# Build the example plugins into target/plugins/.
plugins:
    cargo xtask plugins

# Build the plugins and run every test.
test:
    cargo xtask test

# Run the daemon on its embedded default configuration.
demo:
    cargo xtask demo

# Run the benchmarks (see BENCHMARKS.md).
bench:
    cargo xtask bench
