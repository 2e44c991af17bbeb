python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/sdsite .whl2/*.whl
RUN=rC PEER=sglang PEER_KV=fp8_e4m3 SAW_KV="" POINTS="D(256,1024)@256" RACE_LIMIT=215 bash .devcmd/race.sh
