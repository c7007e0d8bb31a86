# docs/coordinator.md: what the coordinator host holds before the guide's commands.
# - the study's schema.json, made from the shipped ovarian cohorts as a study would;
fedfusion datasets build ovarian data/ovarian
cp data/ovarian/schema.json schema.json
# - the coordinator kit of an earlier `fedfusion provision`, installed where the guide's commands look;
fedfusion provision --sites st-marys,charite,ucl --superlink-host coordinator.example.org --out .setup-kits
mkdir -p /etc/fedfusion /var/lib/fedfusion
cp -r .setup-kits/coordinator /etc/fedfusion/kit
# - the public key a site made itself and sent in (the guide's `new-site.pub`).
ssh-keygen -q -t ecdsa -b 384 -N "" -C new-site -f new-site
