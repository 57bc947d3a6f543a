# Source on the GPU machine (after ../shared/device's bundle printed READY):
#   source benchmarks/device_env.sh
# Puts vLLM and this checkout on PYTHONPATH and registers the plugin's entry
# points with a minimal dist-info (that machine has no index to build a wheel).
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1
_info=/root/site/vllm_cascade-0.1.0.dist-info
mkdir -p "$_info"
printf 'Metadata-Version: 2.1\nName: vllm-cascade\nVersion: 0.1.0\n' > "$_info/METADATA"
python3 - "$_info/entry_points.txt" <<'PY'
import re, sys
setup = open("setup.py").read()
groups = re.findall(r'"(vllm\.[a-z_]+)": \["([^"]+)"\]', setup)
open(sys.argv[1], "w").write("".join(f"[{g}]\n{ep}\n\n" for g, ep in groups))
PY
