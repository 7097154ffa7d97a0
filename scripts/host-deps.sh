#!/usr/bin/env bash
# Install the host packages stemforge needs, then check every tool and file.
#
# usage: host-deps.sh [--check] [--tools FILE] [--path DIRS] [--admindir DIR]
#
#   --check         only check; never run apt
#   --tools FILE    the table of tools (default: host-tools.tsv beside this)
#   --path DIRS     where the table's commands are looked up
#                   (default: $PATH plus the sbin directories)
#   --admindir DIR  dpkg's database, for the QEMU version check
#                   (default: /var/lib/dpkg)
#
# Every package of the table is installed in ONE apt-get run. All of QEMU's
# packages must be built from one version of the qemu source package: on a
# host whose qemu-utils came from backports, installing qemu-system-x86 from
# the main suite would otherwise remove qemu-utils (and qemu-img with it).
# So the QEMU set is requested at one version: the installed one when a
# configured suite has the whole set at that version, else the version the
# archive offers for qemu-system-x86 (downgrading what is installed). apt
# never removes a package here. Afterwards everything is checked again.
#
# Quiet when everything is there. Exit status: 0 everything is there;
# 2 something is missing (one line each, naming its package) or an error.
set -euo pipefail

QEMU_SOURCE=qemu
# The QEMU package whose archive version the set follows when the installed
# version cannot be completed.
QEMU_ANCHOR=qemu-system-x86

say() { printf 'host-deps: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 2
}

check_only=0
table="$(dirname "$0")/host-tools.tsv"
lookup="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
admindir=/var/lib/dpkg
while [ $# -gt 0 ]; do
	case $1 in
	--check) check_only=1 ;;
	--tools | --path | --admindir)
		[ $# -ge 2 ] || die "$1 needs a value"
		case $1 in
		--tools) table=$2 ;;
		--path) lookup=$2 ;;
		--admindir) admindir=$2 ;;
		esac
		shift
		;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
		exit 0
		;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
	shift
done

# The table, as three parallel arrays.
TOOLS=()
PKGS=()
WHENS=()
read_table() {
	local n=0 tool pkg when extra
	[ -r "$table" ] || die "cannot read the tools table $table"
	while IFS=$'\t' read -r tool pkg when extra || [ -n "$tool" ]; do
		n=$((n + 1))
		case $tool in '' | '#'*) continue ;; esac
		case $when in
		always | verify | dev | optional) ;;
		*) die "$table:$n: WHEN is always, verify, dev or optional, not '$when'" ;;
		esac
		if [ -z "$pkg" ] || [ -n "$extra" ]; then
			die "$table:$n: expected TOOL<tab>PACKAGE<tab>WHEN"
		fi
		TOOLS+=("$tool")
		PKGS+=("$pkg")
		WHENS+=("$when")
	done <"$table"
}

# Is a command on the lookup path, or a file (glob) there?
present() {
	local d IFS=:
	if [[ $1 == /* ]]; then
		compgen -G "$1" >/dev/null
		return
	fi
	for d in $lookup; do
		[ -n "$d" ] && [ -f "$d/$1" ] && [ -x "$d/$1" ] && return 0
	done
	return 1
}

# Installed packages of the qemu source: PACKAGE<tab>VERSION<tab>SOURCE-VERSION.
installed_qemu() {
	local status pkg ver src srcver
	dpkg-query --admindir="$admindir" -W \
		-f='${db:Status-Status}\t${binary:Package}\t${Version}\t${source:Package}\t${source:Version}\n' |
		while IFS=$'\t' read -r status pkg ver src srcver; do
			[ "$src" = "$QEMU_SOURCE" ] || continue
			case $status in not-installed | config-files) continue ;; esac
			printf '%s\t%s\t%s\n' "${pkg%%:*}" "$ver" "$srcver"
		done
}

# Everything missing, one line each, into PROBLEMS. Optional rows count
# only for the packages named in $1 (space-separated).
PROBLEMS=()
check() {
	local want_optional=" ${1:-} " i pkg ver srcver first="" mixed=0 list=""
	PROBLEMS=()
	for i in "${!TOOLS[@]}"; do
		if [ "${WHENS[i]}" = optional ] && [[ $want_optional != *" ${PKGS[i]} "* ]]; then
			continue
		fi
		present "${TOOLS[i]}" || PROBLEMS+=("${TOOLS[i]} not found (package ${PKGS[i]})")
	done
	while IFS=$'\t' read -r pkg ver srcver; do
		[ -n "$pkg" ] || continue
		list+="${list:+, }$pkg $ver"
		[ -z "$first" ] && first=$srcver
		[ "$srcver" = "$first" ] || mixed=1
	done <<<"$(installed_qemu)"
	if [ "$mixed" = 1 ]; then
		local why="they must all come from one $QEMU_SOURCE upload"
		PROBLEMS+=("QEMU packages of different versions ($list); $why: make deps installs them so")
	fi
}

report() {
	local p
	for p in "${PROBLEMS[@]}"; do say "$p"; done
}

# The archive's records of packages: PACKAGE<tab>VERSION<tab>SOURCE<tab>SOURCE-VERSION.
RECORDS=""
load_records() {
	local line pkg="" ver="" src="" sname sver
	RECORDS=$(
		{ apt-cache show "$@" 2>/dev/null || true; echo; } | while IFS= read -r line; do
			case $line in
			"Package: "*) pkg=${line#Package: } ;;
			"Version: "*) ver=${line#Version: } ;;
			"Source: "*) src=${line#Source: } ;;
			"")
				if [ -n "$pkg" ]; then
					sname=${src%% *}
					sver=$ver
					[ -n "$sname" ] || sname=$pkg
					[[ $src == *"("*")" ]] && sver=${src#*(} && sver=${sver%)}
					printf '%s\t%s\t%s\t%s\n' "$pkg" "$ver" "$sname" "$sver"
				fi
				pkg="" ver="" src=""
				;;
			esac
		done
	)
}

# The version of package $1 built from qemu source version $2, if any.
version_for() {
	local pkg ver src srcver
	while IFS=$'\t' read -r pkg ver src srcver; do
		if [ "$pkg" = "$1" ] && [ "$src" = "$QEMU_SOURCE" ] && [ "$srcver" = "$2" ]; then
			printf '%s\n' "$ver"
			return
		fi
	done <<<"$RECORDS"
}

# The source version of package $1 at version $2.
srcver_of() {
	local pkg ver src srcver
	while IFS=$'\t' read -r pkg ver src srcver; do
		if [ "$pkg" = "$1" ] && [ "$ver" = "$2" ]; then
			printf '%s\n' "$srcver"
			return
		fi
	done <<<"$RECORDS"
}

is_qemu() {
	local pkg ver src srcver
	while IFS=$'\t' read -r pkg ver src srcver; do
		[ "$pkg" = "$1" ] && [ "$src" = "$QEMU_SOURCE" ] && return 0
	done <<<"$RECORDS"
	return 1
}

candidate() {
	apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'
}

# The suite (as -t takes it) that has package $1 at version $2.
suite_of() {
	local pkg ver rest dist
	while IFS='|' read -r pkg ver rest; do
		ver=${ver// /}
		if [ "$ver" = "$2" ]; then
			read -r _ dist _ <<<"$rest"
			printf '%s\n' "${dist%%/*}"
			return
		fi
	done <<<"$(apt-cache madison "$1" 2>/dev/null)"
}

# The apt-get install arguments: every package of the table, the QEMU set at
# one version. Sets REQUEST and OPTIONAL_WANTED.
REQUEST=()
OPTIONAL_WANTED=""
plan_install() {
	local i pkg ver srcver cand target suite="" installed_versions="" qemu_set=""
	local -A seen=()
	local plain=()
	for i in "${!PKGS[@]}"; do
		pkg=${PKGS[i]}
		[ -z "${seen[$pkg]:-}" ] || continue
		seen[$pkg]=1
		if [ "${WHENS[i]}" = optional ]; then
			cand=$(candidate "$pkg")
			case $cand in '' | '(none)') continue ;; esac
			OPTIONAL_WANTED+=" $pkg"
		fi
		plain+=("$pkg")
	done
	while IFS=$'\t' read -r pkg ver srcver; do
		[ -n "$pkg" ] || continue
		[[ " $installed_versions " == *" $srcver "* ]] || installed_versions+=" $srcver"
		qemu_set+=" $pkg"
	done <<<"$(installed_qemu)"
	# shellcheck disable=SC2086 # a list of package names
	load_records "${plain[@]}" $qemu_set
	REQUEST=()
	for pkg in "${plain[@]}"; do
		if is_qemu "$pkg"; then
			[[ " $qemu_set " == *" $pkg "* ]] || qemu_set+=" $pkg"
		else
			REQUEST+=("$pkg")
		fi
	done
	cand=$(candidate "$QEMU_ANCHOR")
	target=$(srcver_of "$QEMU_ANCHOR" "$cand")
	[ -n "$target" ] ||
		die "no configured suite has $QEMU_ANCHOR: check /etc/apt/sources.list"
	installed_versions=${installed_versions# }
	if [ -n "$installed_versions" ] && [[ $installed_versions != *" "* ]] &&
		[ "$installed_versions" != "$target" ]; then
		if [ -n "$(version_for "$QEMU_ANCHOR" "$installed_versions")" ]; then
			target=$installed_versions
			suite=$(suite_of "$QEMU_ANCHOR" "$(version_for "$QEMU_ANCHOR" "$target")")
		else
			say "no configured suite has $QEMU_ANCHOR at the installed QEMU" \
				"($installed_versions): installing QEMU $target instead"
		fi
	fi
	for pkg in $qemu_set; do
		ver=$(version_for "$pkg" "$target")
		if [ -n "$ver" ]; then
			REQUEST+=("$pkg=$ver")
		elif [[ " ${plain[*]} " == *" $pkg "* ]]; then
			die "no configured suite has $pkg at QEMU $target"
		else
			say "no configured suite has $pkg at QEMU $target;" \
				"apt may refuse to keep the installed one"
		fi
	done
	SUITE=$suite
}

install() {
	local as_root=()
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null || die "installing needs root: run this as root"
		as_root=(sudo)
	fi
	"${as_root[@]}" apt-get update -qq || die "apt-get update failed (its message is above)"
	plan_install
	say "installing: ${REQUEST[*]}${SUITE:+ (from $SUITE)}"
	"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends --no-remove --allow-downgrades \
		${SUITE:+-t "$SUITE"} "${REQUEST[@]}" ||
		say "apt-get install failed (its message is above)"
}

read_table
check
[ ${#PROBLEMS[@]} -gt 0 ] || exit 0
if [ "$check_only" = 1 ]; then
	report
	exit 2
fi
say "installing the host packages; missing now:"
report
SUITE=""
install
check "$OPTIONAL_WANTED"
if [ ${#PROBLEMS[@]} -gt 0 ]; then
	say "still missing after installing:"
	report
	exit 2
fi
say "all host tools and files are present"
