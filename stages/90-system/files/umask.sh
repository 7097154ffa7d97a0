# stemforge: stages/90-system. Files users create are not readable by
# everyone.
umask 027
