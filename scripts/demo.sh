#!/usr/bin/env bash
# Start a gateway (unless one answers), deploy the SSD example (the COCO SSD ssd-test and the
# face SSD ssd-face), call it the seed's way.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export DCF_HOME=${DCF_HOME:-$PWD/.dcf-demo}
GATEWAY=${DCF_GATEWAY:-127.0.0.1:31113}
healthy() { python -c "import urllib.request as u; u.urlopen('http://$GATEWAY/healthz', timeout=1)" 2>/dev/null; }

if ! healthy; then
  echo "starting the gateway on $GATEWAY (state in $DCF_HOME, log in $DCF_HOME/gateway.log)"
  mkdir -p "$DCF_HOME"
  nohup dcf gateway start --port "${GATEWAY##*:}" >"$DCF_HOME/gateway.log" 2>&1 &
  echo $! >"$DCF_HOME/gateway.pid"
  for _ in $(seq 100); do
    healthy && break
    sleep 0.1
  done
fi

cd examples/ssd-detector
set -x
dcf function create -f config.yaml -v --update -g "$GATEWAY"
dcf function list -g "$GATEWAY"
# The answers are JSON without a trailing newline (pipes stay byte-exact): echo one.
cat samples/coffee.jpg | base64 | dcf function call ssd-test -g "$GATEWAY"; echo
cat samples/grace_hopper.jpg | base64 | dcf function call ssd-test -g "$GATEWAY"; echo
cat samples/astronaut.jpg | base64 | dcf function call ssd-face -g "$GATEWAY"; echo
{ set +x; } 2>/dev/null
echo "Dashboard: http://$GATEWAY/ui   Stop the gateway: kill \$(cat $DCF_HOME/gateway.pid)"
