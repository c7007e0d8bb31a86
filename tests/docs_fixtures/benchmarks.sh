# docs/benchmarks.md: its commands run "from the repository root". Link the code they read and give
# them a real docs/results/ folder, so what they write lands here and never in the checkout.
ln -s "$FEDFUSION_REPO/benchmarks" benchmarks
ln -s "$FEDFUSION_REPO/tests" tests
ln -s "$FEDFUSION_REPO/pyproject.toml" pyproject.toml
mkdir -p docs/results
ln -s "$FEDFUSION_REPO/docs/examples" docs/examples
