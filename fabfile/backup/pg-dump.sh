#!/bin/sh
# Inside the postgres container: pg_dump, its stream read whole by pg_restore
# (rows counted) and checksummed *while* it goes out on stdout: no second pass
# over the data. POSIX sh (no pipefail): statuses, counts and the sha256 of the
# uncompressed stream go to stderr as key=value / count lines.
#
# Rows: one per line between "COPY <table> (...) FROM stdin;" and "\.", one
# string comparison per line (a data line can never be a lone "\." in COPY's
# text format: a backslash is written doubled).
export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" PGDATABASE="$POSTGRES_DB"
st=$(mktemp -d) || exit 1
trap 'rm -rf "$st"' EXIT
mkfifo "$st/r" "$st/s" || exit 1
{ pg_restore -f - < "$st/r"; echo "status_restore=$?" > "$st/rs"; } |
  awk 'c{if($0=="\\."){printf "count\t%d\t%s\n", n, t; c=0} else n++; next}
       /^COPY /{t=$0; sub(/^COPY /,"",t); sub(/ \(.*$| FROM stdin;$/,"",t); n=0; c=1}' \
    > "$st/counts" &
sha256sum < "$st/s" > "$st/sha" &
{ pg_dump -Fc -Z0; echo "status_dump=$?" > "$st/ds"; } | tee "$st/r" "$st/s"
echo "status_tee=$?" >&2
wait
cat "$st/counts" "$st/rs" "$st/ds" >&2
echo "raw_sha256=$(cut -d' ' -f1 < "$st/sha")" >&2
