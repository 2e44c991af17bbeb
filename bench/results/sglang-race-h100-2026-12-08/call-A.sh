bash bench/peer/install_gpu.sh sglang || exit 1
export POINTS="D(256,1024)@256" SAW_FLAGS="--window 0 --sinks 0 --k-center false --k-scale false"
RUN=rA PEER=sglang PEER_KV="" SAW_KV=int4-bdr SGLANG_ENGINE_KV=int4-bdr RACE_LIMIT=330 bash .devcmd/race.sh
RUN=rB PEER=sglang PEER_KV=fp8_e4m3 SAW_KV="" RACE_LIMIT=200 bash .devcmd/race.sh
