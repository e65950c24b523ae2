# Helpers every bench script sources: the median of numbers on stdin, microseconds now, and a
# dropped page cache (after a sync) for cold runs.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now_us() { echo $(( $(date +%s%N) / 1000 )); }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
