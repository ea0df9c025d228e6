#!/bin/bash
# Session 11's rig start.sh (../s11-2026-12-07/start.sh) with the guest ELF chosen by GUEST=
# (gab.sh); same arguments.
here=$(dirname "$0")
sed 's|^G=.*|G=${GUEST:-$(ls /work/main/testbed/guest/target/x86_64-unknown-linux-gnu/release/understudy-guest)}|' \
  "$here/../s11-2026-12-07/start.sh" | bash -s -- "$@"
