pkill -f sglang; pkill -f saw-router; pkill -f saw_worker; sleep 1
PEER=sglang PEER_KV="fp8_e4m3" SAW_KV="" SGLANG_ENGINE_KV=int4-bdr BENCH_TIMEOUT=250 OUT=/tmp/r1 timeout 575 bash bench/peer/race_gpu.sh "D(256,1024)@256 D(16384,1024)@64" > /tmp/r1.log 2>&1; tail -30 /tmp/r1.log | cut -c1-300
cp /tmp/r1.log /tmp/r1/; tar czf $OUT/race1.tgz --exclude='*.jsonl' -C /tmp r1
