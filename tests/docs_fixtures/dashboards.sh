# docs/dashboards.md: a coordinator's kit (TLS certificate and key for the dashboard) and its runs folder.
fedfusion provision --sites st-marys,charite,ucl --superlink-host coordinator.example.org --out kit
mkdir -p runs
