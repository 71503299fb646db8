export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
python -m lla_verify info > $OUT/info.txt 2>&1
nvidia-smi >> $OUT/info.txt 2>&1
timeout -s INT -k 20 100 python -m cProfile -o $OUT/prof.out -m pytest -p no:cacheprovider -p no:xdist -q --hypothesis-profile gpu --hypothesis-seed=11 "properties/test_gradients.py::test_gradients_within_budget[spectrum]" > $OUT/prof.log 2>&1
python -c "import pstats; p=pstats.Stats('$OUT/prof.out'); p.sort_stats('cumulative').print_stats(60); p.sort_stats('tottime').print_stats(40)" > $OUT/prof.txt 2>&1
OUT=$OUT/rel ONLY=pytest LIMIT=430 JOBS=16 PYTEST_ARGS="--hypothesis-seed=11 --durations=60 -rs" bash scripts/gpu-release.sh > $OUT/rel.log 2>&1
