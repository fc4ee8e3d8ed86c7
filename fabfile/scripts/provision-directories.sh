#!/usr/bin/env bash
# provision: create each directory, or fix its mode and owner; prints the paths
# it changed.
#   provision-directories.sh USER GROUP PATH MODE [PATH MODE...]
user=$1 group=$2
shift 2
while [ $# -ge 2 ]; do
  path=$1 mode=$2
  shift 2
  if [ "$(stat -c '%a %U %G' "$path" 2>/dev/null)" != "$mode $user $group" ]; then
    install -d -m "$mode" -o "$user" -g "$group" "$path" && echo "$path"
  fi
done
