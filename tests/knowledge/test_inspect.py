"""`inspect`'s table of module paths, output shapes and parameters (protege.knowledge.inspect)."""



def test_inspect_lists_paths_with_shapes_and_params():
    from protege.api import inspect

    table = inspect("cnn", "1,28,28")
    assert "features.1.0" in table and "32x14x14" in table and "4,608" in table
    assert table.strip().splitlines()[-1].split()[-1] == "24,058"  # the zoo student's parameter count


def test_inspect_lists_hidden_state_and_attention_taps(folders):
    from protege.api import inspect

    table = inspect(str(folders["teacher"]), "12")
    assert "hidden.4" in table and "attention.3" in table and "2x12x12" in table and "12x32" in table
