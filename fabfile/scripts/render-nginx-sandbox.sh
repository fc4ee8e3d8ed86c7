#!/bin/sh
# render's nginx -t, in a private mount namespace (unshare --mount): the
# rendered /etc/nginx and an /etc/hosts naming the upstreams are bound over
# this machine's, then nginx checks the configuration.
#   SANDBOX=DIR render-nginx-sandbox.sh   (DIR/etc-nginx, DIR/hosts)
set -e
mount --bind "$SANDBOX/etc-nginx" /etc/nginx
mount --bind "$SANDBOX/hosts" /etc/hosts
exec nginx -t -c /etc/nginx/nginx.conf
