# stemforge: stages/80-accounts. Runs inside the tree (set -eu).

# Insert LINE after the first line of FILE matching REGEX; fail when the
# anchor is missing (a distribution that changed its PAM files).
insert_after() {
    file=$1 regex=$2 line=$3
    grep -qxF "$line" "$file" && return 0
    grep -Eq "$regex" "$file" || { echo "$file: no line matches $regex" >&2; exit 1; }
    awk -v re="$regex" -v line="$line" '{ print } !done && $0 ~ re { print line; done = 1 }' \
        "$file" > "$file.stemforge"
    cat "$file.stemforge" > "$file"
    rm -f "$file.stemforge"
}

# Set KEY to VALUE in login.defs (replacing the active line, or adding one).
login_defs() {
    if grep -qE "^$1[[:space:]]" /etc/login.defs; then
        sed -i -E "s|^$1[[:space:]].*|$1\t$2|" /etc/login.defs
    else
        printf '%s\t%s\n' "$1" "$2" >> /etc/login.defs
    fi
}

# Passwords: no empty ones (nullok off), history through its own profile
# (the pwquality profile came with libpam-pwquality).
sed -i -E 's/[[:space:]]+nullok\b//' /usr/share/pam-configs/unix
pam-auth-update --package
grep -q 'pam_pwhistory.so' /etc/pam.d/common-password
if grep -q 'nullok' /etc/pam.d/common-auth /etc/pam.d/common-password; then
    echo "pam_unix still allows empty passwords" >&2
    exit 1
fi

# su: only members of the root group (it has none), and root itself.
insert_after /etc/pam.d/su '^auth[[:space:]]+sufficient[[:space:]]+pam_rootok.so' \
    'auth       required   pam_wheel.so use_uid group=root'

# root logs in on the console only (and root is locked anyway).
insert_after /etc/pam.d/login '^auth[[:space:]]+requisite[[:space:]]+pam_nologin.so' \
    'auth       requisite  pam_securetty.so'

# Password ageing for accounts given passwords later; private homes.
login_defs PASS_MIN_DAYS 1
login_defs PASS_WARN_AGE 7
login_defs HOME_MODE 0750

# cron and at: allow lists only.
rm -f /etc/cron.deny /etc/at.deny

# Set-id programs: only sudo and su keep their bits. dpkg-statoverride
# records each change, so a package upgrade does not put the bit back.
find / -xdev -type f -perm /6000 ! -path /usr/bin/sudo ! -path /usr/bin/su -print |
while read -r f; do
    owner=$(stat -c %U "$f") group=$(stat -c %G "$f")
    mode=$(printf '%o' $(( 0$(stat -c %a "$f") & 0777 )))
    dpkg-statoverride --quiet --remove "$f" || true
    dpkg-statoverride --update --add "$owner" "$group" "$mode" "$f"
done
