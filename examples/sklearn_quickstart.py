"""gradtune's gradient descent as scikit-learn estimators (README, "scikit-learn")."""

from sklearn.datasets import load_diabetes
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gradtune.sklearn import GDRegressor

X, y = load_diabetes(return_X_y=True)
model = make_pipeline(StandardScaler(), GDRegressor())  # batch GD; lr and momentum "auto"
model.fit(X, y)
gd = model[-1]
print(f"R^2 {model.score(X, y):.4f} after {gd.n_iter_} epochs at lr {gd.lr_:.4g}: {gd.stop_reason_}")

grid = {"gdregressor__lr": ["auto", 0.01, 0.1], "gdregressor__batch_size": ["full", 32]}
search = GridSearchCV(make_pipeline(StandardScaler(), GDRegressor(max_iter=50, tol=None)), grid, cv=3).fit(X, y)
print("best:", search.best_params_, f"R^2 {search.best_score_:.4f}")

Xs = StandardScaler().fit_transform(X)
GDRegressor().fit(Xs, y).save("runs/sklearn-diabetes")  # a run folder: gradtune eval / predict read it
print("saved to runs/sklearn-diabetes; back with GDRegressor.load('runs/sklearn-diabetes')")
