# Usage: RUN=rN [env for race_gpu.sh] bash .devcmd/race.sh  — one race_gpu.sh run into /tmp/$RUN, tarred into $OUT
pkill -f sglang; pkill -f saw-router; pkill -f saw_worker; sleep 1
OUT=/tmp/$RUN BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} timeout ${RACE_LIMIT:-560} bash bench/peer/race_gpu.sh "${POINTS:-D(256,1024)@256 D(16384,1024)@64}" > /tmp/$RUN.log 2>&1
grep -E "^==|output_tps|rror|copy" /tmp/$RUN.log | cut -c1-250 | tail -30
cp /tmp/$RUN.log /tmp/$RUN/; tar czf $OUT/$RUN.tgz --exclude='*.jsonl' -C /tmp $RUN
