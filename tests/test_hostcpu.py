from edgeres import hostcpu


def test_describe_names_the_cpu_and_only_kernel_relevant_isa():
    host = hostcpu.describe()
    assert isinstance(host["cpu"], str) and host["cpu"]
    assert host["cores_available"] >= 1
    assert set(host["isa"]) <= set(hostcpu.KERNEL_ISA) and host["isa"] == sorted(host["isa"])
    assert hostcpu.has_amx_int8() == ("amx_int8" in host["isa"])
    assert hostcpu.has_native_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(host["isa"]))
