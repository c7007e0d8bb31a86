# docs/plugins.md: its commands run from the repository root and install examples/fedfusion-plugin-example.
# A copy, not a link: pip writes build/ into the folder it installs from, which must not be the checkout.
cp -r "$FEDFUSION_REPO/examples" examples
