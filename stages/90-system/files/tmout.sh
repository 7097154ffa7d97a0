# stemforge: stages/90-system. Idle interactive shells end after 15
# minutes; the setting cannot be undone in the session.
TMOUT=900
readonly TMOUT
export TMOUT
