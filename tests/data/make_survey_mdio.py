"""How tests/data/survey.mdio was made (not run by the tests): the irregular SEG-Y of
tests/test_formats.py's `survey` fixture, converted by multidimio's own segy_to_mdio.
multidimio 1.1.3 pins fsspec < 2026.2 and zarr <= 3.1.6, so it is not a test dependency:
run this in a virtual environment with `pip install multidimio==1.1.3 segyio`, in
tests/data."""
def main():
    import shutil

    import numpy as np
    import segyio
    cube = np.random.default_rng(0).standard_normal((24, 16, 24)).astype(np.float32)
    ilines = [100, 102, 104, 110, 112] + list(range(120, 160, 2))[:19]
    xlines = list(range(300, 316))
    dt_us = 4000
    spec = segyio.spec(); spec.sorting = 2; spec.format = 5
    spec.samples = np.arange(cube.shape[2]) * dt_us / 1000
    spec.ilines, spec.xlines, spec.offsets = ilines, xlines, [1]
    with segyio.create("survey.sgy", spec) as f:
        tr = 0
        for i, il in enumerate(ilines):
            for j, xl in enumerate(xlines):
                f.header[tr] = {segyio.su.iline: il, segyio.su.xline: xl, segyio.su.offset: 1,
                                segyio.su.cdpx: 1000 + il * 25, segyio.su.cdpy: 5000 + xl * 25, segyio.su.scalco: 1}
                f.trace[tr] = cube[i, j]; tr += 1
        f.bin.update(hns=cube.shape[2], format=5, hdt=dt_us)
    from mdio import segy_to_mdio
    from mdio.builder.template_registry import get_template
    from segy.standards import get_segy_standard
    spec = get_segy_standard(1.0)
    tmpl = get_template("PostStack3DTime")
    shutil.rmtree("survey.mdio", ignore_errors=True)
    segy_to_mdio(spec, tmpl, "survey.sgy", "survey.mdio", overwrite=True)
    import mdio
    ds = mdio.open_mdio("survey.mdio")
    print(ds)
    a = ds["amplitude"].values
    print(np.abs(a - cube).max())


if __name__ == "__main__":
    main()
