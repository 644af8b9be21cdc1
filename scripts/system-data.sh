#!/bin/sh
# Debian data packages used by the experiments: Fashion-MNIST and WordNet.
# Installed only where apt-get exists and we are root; elsewhere the loaders say how to get the data.
set -u
missing=""
[ -d /usr/share/datasets/fashion-mnist ] || missing="$missing dataset-fashion-mnist"
[ -f /usr/share/wordnet/data.noun ] || missing="$missing wordnet-base"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
    || echo "warning: could not apt-get install$missing; tests that need them will fail with instructions"
else
  echo "note: not root or no apt-get; install$missing yourself (see README)"
fi
exit 0
