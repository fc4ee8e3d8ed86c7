#!/bin/sh
# Entrypoint of the alertmanager container (maicivy-ops).
#
#   entrypoint.sh run [alertmanager flags...]   fill in the secrets, start Alertmanager
#   entrypoint.sh reload                         fill them in again, SIGHUP Alertmanager
#
# /etc/alertmanager/alertmanager.yml (rendered, no secret) names each secret
# by a placeholder URL http://maicivy.invalid/<VARIABLE>; the copy Alertmanager
# reads, /tmp/alertmanager/alertmanager.yml (mode 600), has the values of those
# variables from the environment (.env). The SMTP password goes to a file of
# its own (auth_password_file), so no quoting can break it.
set -eu
umask 077
# (The AM_* overrides exist for the unit test, which runs this script as is.)
src=${AM_CONFIG:-/etc/alertmanager/alertmanager.yml}
dir=${AM_RUN_DIR:-/tmp/alertmanager}
bin=${AM_BIN:-/bin/alertmanager}
placeholder=http://maicivy.invalid/

fill() {
    mkdir -p "$dir"
    for name in ALERT_WEBHOOK_URL ALERT_HEARTBEAT_URL; do
        if grep -q "$placeholder$name" "$src" && [ -z "$(printenv "$name" || true)" ]; then
            echo "alertmanager: error: $name is empty in .env but the settings enable its receiver" >&2
            exit 78
        fi
    done
    if grep -q "auth_password_file" "$src" && [ -z "${ALERT_SMTP_PASSWORD:-}" ]; then
        echo "alertmanager: error: ALERT_SMTP_PASSWORD is empty in .env but maicivy.alertmanager.email.username is set" >&2
        exit 78
    fi
    printf '%s' "${ALERT_SMTP_PASSWORD:-}" >"$dir/smtp_password.new"
    mv -f "$dir/smtp_password.new" "$dir/smtp_password"
    # Values go into single-quoted YAML strings: a quote is doubled.
    awk -v p="$placeholder" '
        BEGIN { n = split("ALERT_WEBHOOK_URL ALERT_HEARTBEAT_URL", names, " ") }
        {
            for (i = 1; i <= n; i++) {
                key = p names[i]; v = ENVIRON[names[i]]; gsub(/\047/, "\047\047", v)
                while ((k = index($0, key)) > 0)
                    $0 = substr($0, 1, k - 1) v substr($0, k + length(key))
            }
            print
        }' "$src" >"$dir/alertmanager.yml.new"
    mv -f "$dir/alertmanager.yml.new" "$dir/alertmanager.yml"
}

case "${1:-run}" in
reload)
    fill
    kill -HUP 1
    ;;
run)
    [ "$#" -eq 0 ] || shift
    fill
    exec "$bin" --config.file="$dir/alertmanager.yml" "$@"
    ;;
*)
    echo "usage: entrypoint.sh run [flags...] | reload" >&2
    exit 64
    ;;
esac
